"""The worker: the compute core, the pipeline around it and the Celery shell.

Importing this package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already names a
policy. By default an OpenMP thread spins for a while after each parallel region of the model's
CPU kernels, burning a core the pipeline's decoding, encoding and uploading threads need: on two
cores, ``producer submit --local`` of deit_tiny kept 84 % of the compute-alone rate with spinning
threads and 93–100 % with passive ones (``bench/bench_end_to_end.py``). OpenMP reads the variable
when torch loads, so it only takes effect in a process that imports ``worker`` first — the CLIs,
the Celery worker and its spawned pool processes all do.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
