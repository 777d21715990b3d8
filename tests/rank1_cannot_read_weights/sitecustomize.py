"""For tests/test_server_parallel.py: a server started with this folder on PYTHONPATH gets a rank 1 worker that
cannot read its weights (a disk that fails one process, a path that another node lacks).

Python imports `sitecustomize` at the start of every process whose path holds it: here the coglet server, its
worker (rank 0) and the worker processes of a server on several GPUs. Only in rank 1's (`python -m
flux.rank_worker --rank 1 ...`) does it change anything: the weights directory it is told becomes one that does
not exist, so that its real setup fails where a real one would, while loading the transformer.
"""

import sys

_argv = sys.orig_argv
if "flux.rank_worker" in _argv and _argv[_argv.index("--rank") + 1] == "1":
    sys.argv[sys.argv.index("--weights") + 1] = "/nonexistent/rank-1-weights"
