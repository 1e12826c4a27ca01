"""The Jupyter side of the kernel process: the "Python (microVM)" kernel and its application.

Run by `python -m supermachine_kernel.kernel -f CONNECTION_FILE` (__main__.py). Importing this
package imports nothing: the start-up sequence runs before ipykernel is loaded.
"""
