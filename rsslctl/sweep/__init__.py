"""Running sweeps (``rsslctl sweep``): jobs, the local and Slurm executors, live progress and the sweep log."""
