"""Comparison reports from MLflow runs: ``python -m moe_morpheus.report experiment=NAME``.

collect (MLflow -> frames) -> analysis (pure numbers) -> figures (PNGs) -> build (sections)
-> render (report.md and a self-contained report.html).
"""
