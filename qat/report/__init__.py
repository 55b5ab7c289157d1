"""The qat-report command (python -m qat.report); the tables and plot are qat.eval.report."""
