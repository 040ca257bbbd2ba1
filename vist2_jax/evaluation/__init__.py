"""Evaluation: does the visual memory carry the text? OCR reconstruction, the memory
ablation (true vs blank sketches vs raw text), and long-context / math benchmarks."""
