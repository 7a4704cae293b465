"""The evaluation harness behind ``fusion-engine eval``, callable from Python: ``run(EvalSettings(...))``.

``engine.py`` plans and runs the work items, ``pairs.py`` reads pairs.toml, ``report.py`` writes the score rows
and report.md, ``sharding.py`` splits the work across processes, ``loading.py`` loads the model and encoders.
"""
from .engine import parse_policy, plan, run
from .pairs import Pair, load_pairs
from .settings import DEFAULT_POLICIES, EvalSettings
from .sharding import shard_from_env

__all__ = ["DEFAULT_POLICIES", "EvalSettings", "Pair", "load_pairs", "parse_policy", "plan", "run", "shard_from_env"]
