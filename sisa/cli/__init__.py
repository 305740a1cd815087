"""The ``sisa`` command: a thin typed shell over the library (``main``), with the evidence commands in ``audit``."""
