"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in JAX and Flax."""
