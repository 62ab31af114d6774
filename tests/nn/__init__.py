# A package, so tests/nn/test_X.py and tests/ops/test_X.py may share a basename.
