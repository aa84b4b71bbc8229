"""Teaching labs: exercise notebooks on what fine-tuning does to a network, each exercise checked.

Instructors::

    ftanalysis labs list                       # the labs, with their titles
    ftanalysis labs get 01 --dest week1/       # a ready student notebook (--solutions for the solution copy)
    ftanalysis labs build --check              # rebuild every copy; fail on malformed markers or leaks
"""

from .build import Lab, MarkerError, available, build, find, get, make_copy, read_source, student_source, validate

__all__ = ["Lab", "MarkerError", "available", "build", "find", "get", "make_copy", "read_source", "student_source", "validate"]
