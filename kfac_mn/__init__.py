"""kfac_mn: distributed K-FAC for large mini-batch training (Osawa et al.)."""
from kfac_mn import (  # noqa: F401
    backend,
    functions,
    initializers,
    links,
    optimizer_hooks,
    optimizers,
    serializers,
)
from kfac_mn.configuration import config, no_backprop_mode, using_config  # noqa: F401
from kfac_mn.function_hook import FunctionHook  # noqa: F401
from kfac_mn.function_node import FunctionNode  # noqa: F401
from kfac_mn.link import Chain, ChainList, Link  # noqa: F401
from kfac_mn.variable import Parameter, Variable, as_variable  # noqa: F401

__version__ = "0.1.0"
