"""DHR-CLIP industrial inspection service."""

from service.errors import UserError
from service.runtime import apply_thread_policy

__version__ = "0.1.0"

# The thread policy must be in the environment before torch loads OpenMP, i.e. before any of our modules imports
# torch: importing this package is the one step every entry point takes first (service/runtime.py explains).
try:
    apply_thread_policy()
except UserError:
    pass  # a bad DHR_THREAD_POLICY: the entry point (dhrclip, create_app) calls it again and reports the error
