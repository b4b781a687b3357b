"""The worker: the compute core, the pipeline around it and the Celery shell.

Importing it changes nothing in the process: the OpenMP wait policy the worker's processes run
with is set by their entry points (``worker.cores.wait_passively_in_openmp``).
"""
