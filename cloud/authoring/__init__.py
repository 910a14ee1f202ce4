"""Model authoring on the cloud side: TensorFlow modules converted to LiteRT.

Everything in this package except :mod:`cloud.authoring.opcheck` and
:mod:`cloud.authoring.commands` (whose TensorFlow import is deferred) needs TensorFlow.
Devices never import it; they get a ``.tflite`` file and a ``card.json``.
"""
