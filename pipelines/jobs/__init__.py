"""The jobs, one module each: bulk reconstruction, body fits, evaluation, calibration, training, data, the lifter, reports."""
