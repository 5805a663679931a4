"""Conversion rules for other libraries' modules (see fusednorm.convert.register_rule).

Each module here is imported only when convert meets a module of that library, so fusednorm never
imports diffusers or timm itself.
"""
