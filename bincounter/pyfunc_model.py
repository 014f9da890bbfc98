"""Models-from-code entry: MLflow runs this file to get the model object; nothing is unpickled (every model logged
so far carries this same file: keep `bincounter.serving.BinCounterModel` where it is)."""
import mlflow

from bincounter.serving import BinCounterModel

mlflow.models.set_model(BinCounterModel())
