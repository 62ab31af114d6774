"""One module per op family: each backend's implementation of the family's ops."""
