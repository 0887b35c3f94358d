"""Getting pretrained weights over the network without hanging when there is none: a
reachability probe (3 s) before any download, a timeout on every socket, the Hugging Face hub
held to its cache when the host is unreachable, and one warning instead of an exception when
the weights cannot be had (the caller trains from scratch). torch and huggingface_hub are
imported inside functions.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from medcli import console
from medcli.errors import MedcliError

__all__ = ["download_state_dict", "fetch", "one_line", "unreachable"]

CONNECT_TIMEOUT_S = 3.0  # reachability probe before a download
SOCKET_TIMEOUT_S = 30.0  # any single socket operation while downloading weights
# How long the other processes of a distributed job wait for rank 0's download (ViT-B/16's
# 350 MB at 1 MB/s is 6 minutes): longer than the collective timeout, which fits training steps.
DOWNLOAD_WAIT_S = 1800.0


def download_state_dict(url: str, offline: bool) -> dict:
    """torch hub's cached download; offline, only the cache is consulted."""
    import torch

    cached = Path(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if offline and not cached.is_file():
        raise ConnectionError(f"not in the torch hub cache {cached.parent}")
    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True, weights_only=True)


def fetch(label: str, url: str, load: Callable[[bool], Any]) -> Any:
    """Run `load(offline)` that may download from `url`; None after one warning if it fails.

    A failing download must not hang training: Hugging Face retries for about a minute when there
    is no network, so we probe the host first (3 s) and, when it is unreachable or HF_HUB_OFFLINE
    is set, let the hub serve only its cache. Every socket also gets a timeout.

    In a distributed job rank 0 fetches alone while the others wait (DOWNLOAD_WAIT_S), then
    they load what it fetched from the cache (a node without it downloads it), or, when rank 0
    could not, train from scratch as it does: every process starts alike (same weights and lr)."""
    from medcli import distributed

    if not distributed.joined():
        return _fetch(label, url, load)
    ctx = distributed.from_env()
    mine: list = []
    fetched = distributed.from_main(ctx, lambda: mine.append(_fetch(label, url, load)) or mine[0] is not None,
                                    timeout_s=DOWNLOAD_WAIT_S)
    if ctx.is_main or not fetched:
        return mine[0] if mine else None
    result = _fetch(label, url, load)
    if result is None:  # it would train from other weights at another lr than rank 0
        raise MedcliError(f"rank {ctx.rank} could not load the pretrained weights for {label} that rank 0 fetched; "
                          f"give every node network access or the same cache, or pass --weights FILE")
    return result


def _fetch(label: str, url: str, load: Callable[[bool], Any]) -> Any:
    reason = unreachable(url)
    try:
        with _socket_timeout(SOCKET_TIMEOUT_S), _hub_offline(reason is not None):
            return load(reason is not None)
    except Exception as exc:  # any download, cache or format failure means: train from scratch
        why = "; ".join(part for part in (reason, one_line(exc)) if part)
        console.warn(
            f"could not fetch pretrained weights for {label} ({why}); training from scratch. "
            "Use --weights FILE to supply them offline"
        )
        return None


def unreachable(url: str) -> str | None:
    """Why `url` cannot be downloaded now (HF_HUB_OFFLINE, or no TCP connection), else None."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    direct, proxies = urlparse(url), urllib.request.getproxies()
    proxy = None if urllib.request.proxy_bypass(direct.hostname or "") else proxies.get(direct.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:  # "host:3128", as requests and httpx accept it
        proxy = f"http://{proxy}"
    target = urlparse(proxy or url)  # the proxy for the URL's scheme, unless NO_PROXY names its host
    port = target.port or (80 if target.scheme == "http" else 443)
    try:
        socket.create_connection((target.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot reach {target.hostname}: {one_line(exc)}"
    return None


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Hugging Face hub in offline mode (cache only) for the duration, when asked.

    The hub reads HF_HUB_OFFLINE once at import; this applies our decision to this call."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
