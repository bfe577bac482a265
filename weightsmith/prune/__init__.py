"""Pruners: recipe steps of kind ``pruner`` that zero weights and record a sparsity mask."""
