"""Failing fast without a network: before greenmim asks the Hugging Face Hub for a model, weights or a dataset,
:func:`hub_reachable` checks that the endpoint (``HF_ENDPOINT``) answers an HTTP request within :data:`TIMEOUT_S`.
If it does not, the process goes offline (``HF_HUB_OFFLINE=1``: only the HF cache is read, by huggingface_hub and
datasets alike) and says so in one line, instead of retrying for most of a minute."""
import os
import sys
import urllib.error
import urllib.request
from typing import Optional

__all__ = ['TIMEOUT_S', 'connection_error', 'hub_reachable', 'is_hub_id']

TIMEOUT_S = 3.0


def is_hub_id(source: str) -> bool:
    """``org/name`` (not an existing path): what the data and weights options read as a Hub repository."""
    return source.count('/') == 1 and not source.startswith(('.', '/', '~')) and not os.path.exists(source)


def connection_error(url: str, timeout: float = TIMEOUT_S) -> Optional[OSError]:
    """``None`` when ``url`` answers an HTTP ``HEAD`` within ``timeout`` (any status), else the error (no route
    or name, refused, timed out)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method='HEAD'), timeout=timeout).close()
    except urllib.error.HTTPError:  # it answered
        return None
    except OSError as e:
        return e
    return None


def hub_reachable(what: str) -> bool:
    """``False`` when ``what`` must come from the HF cache: ``HF_HUB_OFFLINE`` is set, or the endpoint did not
    answer within :data:`TIMEOUT_S` (then offline mode is switched on and one line says so)."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    error = connection_error(constants.ENDPOINT)
    if error is None:
        return True
    os.environ['HF_HUB_OFFLINE'] = '1'  # for datasets when imported later
    constants.HF_HUB_OFFLINE = True
    if 'datasets' in sys.modules:
        sys.modules['datasets'].config.HF_HUB_OFFLINE = True
    print(f'offline: no answer from {constants.ENDPOINT} within {TIMEOUT_S:g} s ({error}); {what} comes from the '
          'HF cache only (as with HF_HUB_OFFLINE=1)', file=sys.stderr, flush=True)
    return False
