class TunedeckError(Exception):
    """An error a user can act on; its message is shown to them as it is."""


class DatasetError(TunedeckError):
    pass


class ModelFolderError(TunedeckError):
    pass


class TrainingError(TunedeckError):
    pass


class OutOfMemory(TrainingError):
    pass
