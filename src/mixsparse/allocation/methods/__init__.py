"""The built-in allocation methods, one module each; importing them registers them, in the order
`mixsparse list` shows them."""

from . import uniform, owl, hessian, fisher, msp, joint, file  # noqa: F401,I001
