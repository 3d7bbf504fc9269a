"""Judges: each turns a response into entries of the reward vector (rules.py, llm.py, rubric.py, built from a
config spec by factory.py on what base.py shares); worker.py scores a sample with all K judges, pool.py
schedules the workers, service.py hosts the pool as an actor that writes entries into the buffer."""
