"""pvmmu: a guest/host pair that measures batched paravirtual MMU hypercalls.

This package is the supervisor and CLI, plus the OS glue the process shells
share (shared memory, the doorbell, liveness). The cores are elsewhere:
``protocol`` (bytes), ``host_proc`` (KVM's side), ``guest_proc`` (the guest
kernel's side). Importing it is cheap: nothing heavy happens here.
"""

__version__ = "0.1.0"
