"""The built-in IR ops, one module per family. Importing this package registers them."""
from . import creation, elementwise, linalg, nn, norm, opaque, reduce, shape  # noqa: F401
from .. import region  # noqa: F401  (region, state_load, state_store)
