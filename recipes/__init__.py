"""The shipped recipes, installed with rsslctl as package data (`rsslctl recipe list`, `rsslctl recipe copy`)."""
