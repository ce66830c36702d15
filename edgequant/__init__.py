"""edgequant: measure what each quantization level of a model costs and breaks.

The pipeline is visible in the subpackages and data flows one way:
profiles (declarative inputs) -> quantize (artifacts) -> bench (measurements)
-> results (rows, tables).  ``edgequant.cli`` is a thin layer over them.
"""

__version__ = "0.1.0"
