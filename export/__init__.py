"""Export stage: checkpoint directory -> verified ONNX model directory.

Entry points: `export.pipeline.export_checkpoint` (function API) and
`charstream-export` / `python -m export` (command line). Importing this
package imports nothing heavy; torch is needed only by the pipeline.
"""
