"""``python -m facecore``: the same as the ``facecore`` command (also for ``torchrun -m facecore``)."""

from .cli import main

main()
