"""The data-aware stages: criteria (``criteria``), calibration statistics (``calibration``) and the\nrecovery steps (``recovery``). Imports :mod:`fxprune.core` and nothing above it."""
