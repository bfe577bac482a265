"""Weight-space inspection and alignment of whole checkpoints (issue 16): model-zoo statistics
(``spectra``), Watch-the-Weights diffs and monitoring (``diff``, ``monitor``), permutation weight
matching (``align``, ``lap``, ``barrier``)."""
