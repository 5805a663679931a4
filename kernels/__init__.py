"""Triton kernels of fusednorm and their launchers (installed as ``fusednorm.kernels``).

Nothing here knows about nn.Modules or autograd: launchers take tensors and return tensors.
"""
