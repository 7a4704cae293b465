"""A small world where fusion can be judged: procedural shapes x styles, a tiny trained text-to-image model,
a real subject LoRA and a real style LoRA, small trained judges and two transparent measures.

``fusion_engine.toy.world.load_toy_world`` loads the shipped weights; ``train_*.py`` remake them.
"""
