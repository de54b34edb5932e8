# Sourced by the GPU-machine scripts. cudarc dlopens cuBLAS by name (libcublas.so, libcublas.so.13); on
# an image where cuBLAS only ships inside a Python package (PyTorch's nvidia-cublas wheel), put that
# directory on the loader path. Prints what it found.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  lk_cublas=$(find /usr/local /opt /usr/lib /usr/lib64 -name 'libcublas.so.13*' 2>/dev/null | head -n 1)
  [ -n "$lk_cublas" ] && export LD_LIBRARY_PATH="$(dirname "$lk_cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "cuBLAS: ${lk_cublas:-not found} (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})"
else
  echo "cuBLAS: on the loader path"
fi
