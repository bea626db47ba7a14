"""The `edgequant` command line and its model and data loading."""
