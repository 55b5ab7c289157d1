"""Evaluation. Import from the modules: `from qat.eval.perplexity import perplexity`.

Nothing is re-exported here on purpose: a package attribute `perplexity` (the function) would shadow
the submodule `qat.eval.perplexity` for `import qat.eval.perplexity as ...`.
"""
