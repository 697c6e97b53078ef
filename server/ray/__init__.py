"""cadre on Ray Serve: N cadre replicas behind Ray's HTTP proxy, placed by expert affinity.

    python -m server.ray --replicas 2 --cache-fraction 0.25     # a local Ray cluster, demo model

Request path: Ray's proxy -> CadreIngress (reads the body, predicts the prompt's experts
with router.token_profile) -> ExpertAffinityRouter (router.affinity over the replicas'
routing stats) -> CadreReplica (server.app's FastAPI app, run in-process). See docs/ray.md.

The request-router API is alpha in Ray 2.60 and parts used here are private (the replica
wrapper's attributes, the power-of-two router's module path): `check_ray_version()` fails
at start on any other Ray than the one tested.
"""

from __future__ import annotations

TESTED_RAY_VERSION = "2.60.0"


class RayVersionError(RuntimeError):
    pass


def check_ray_version() -> None:
    """Raise RayVersionError unless the installed ray is the tested one (or absent)."""
    try:
        import ray
    except ImportError as exc:
        raise RayVersionError(f"ray is not installed: pip install 'ray[serve]=={TESTED_RAY_VERSION}'") from exc
    if ray.__version__ != TESTED_RAY_VERSION:
        raise RayVersionError(f"cadre's Ray Serve integration is tested with ray {TESTED_RAY_VERSION} (its "
                              f"request-router API is alpha); found ray {ray.__version__}: "
                              f"pip install 'ray[serve]=={TESTED_RAY_VERSION}'")
