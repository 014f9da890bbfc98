"""Models-from-code entry: MLflow runs this file to get the model object; nothing is unpickled."""
import mlflow

from bincounter.serving import BinCounterModel

mlflow.models.set_model(BinCounterModel())
