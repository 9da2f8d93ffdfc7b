"""`serve run conserve.deploy:app replicas=2 model=PATH ...`: conserve as a Ray Serve application, the
`conserve serve` flags as key=value arguments (conserve/cluster/deploy.py)."""

from conserve.cluster.deploy import app

__all__ = ["app"]
