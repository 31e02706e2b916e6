"""The one place aifab connects to Ray: the cluster at $RAY_ADDRESS, or a local one started on first use.

Ray is an optional dependency (`pip install 'aifab[ray]'`); every `--engine ray` goes through `connect()`, so
a missing install is one clear error naming the extra, whichever verb asked for it.
"""

import os
from types import ModuleType

from aifab.errors import AifabError


def connect(error: type[AifabError] = AifabError, what: str = "--engine ray") -> ModuleType:
    """The `ray` module, initialised: on the cluster at $RAY_ADDRESS when set, else a local one (this machine's
    cores). Without Ray installed, raises `error` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise error(f"{what} needs Ray: pip install 'aifab[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)
    return ray
