"""kvlane's P/D router: an OpenAI-compatible HTTP front that asks the policy service for a pair per request
and fans the request out to the prefill and decode engines (`app`), plus the pure request rewriting it
applies (`params`). Runs in the router process (`kvlane router serve`); never moves KV bytes itself.
"""

from .app import EngineFailed, Router, RouterConfig, RouterMetrics, exposure_warning, serve
from .params import KVLANE_FIELDS, BadRequest

__all__ = ["KVLANE_FIELDS", "BadRequest", "EngineFailed", "Router", "RouterConfig", "RouterMetrics",
           "exposure_warning", "serve"]
