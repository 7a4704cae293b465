"""Training scripts of the toy world (``fusion_engine.worlds.toy``); not part of the installed package."""
