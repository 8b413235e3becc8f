"""Hook specifications: every plugin kind is one hook returning the classes a plugin provides.

A plugin is any module registered under the ``rsslctl`` entry-point group that implements some of
these hooks with ``@rsslctl.hookimpl``. Each returned class has a ``name`` (str), an ``Options``
dataclass (see rsslctl.base.options) and a docstring whose first line describes it.
"""
import pluggy

hookspec = pluggy.HookspecMarker("rsslctl")


@hookspec
def rsslctl_methods() -> list[type]:
    """Pretraining methods (subclasses of rsslctl.method.base.Method)."""


@hookspec
def rsslctl_attacks() -> list[type]:
    """Adversarial attacks (subclasses of rsslctl.adversary.attack.Attack)."""


@hookspec
def rsslctl_backbones() -> list[type]:
    """Backbone builders (subclasses of rsslctl.nn.encoder.Backbone)."""


@hookspec
def rsslctl_coreset_selectors() -> list[type]:
    """Coreset selectors (subclasses of rsslctl.method.coreset.CoresetSelector)."""


@hookspec
def rsslctl_datasets() -> list[type]:
    """Datasets (subclasses of rsslctl.data.dataset.Dataset)."""


@hookspec
def rsslctl_commands() -> list:
    """Extra CLI verbs: ``click.Command`` objects added to ``rsslctl`` (e.g. a method's post-processing step)."""


@hookspec
def rsslctl_declarations() -> list:
    """Lazy declarations (``rsslctl.base.registry.Declared``) of plugins implemented in other modules of the same
    distribution, from a torch-free module in the ``rsslctl.declarations`` entry-point group."""
