"""Teachers: the actor pool, the student's requests to it, and the on-disk cache of their outputs.

May import: workers.contract, workers.losses, workers.data, workers.models, workers.inference.
"""
