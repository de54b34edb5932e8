# Sourced by gpu-check.sh and gpu-profile.sh. cudarc loads cuBLAS by name at run time (libcublas.so,
# libcublas.so.13); where it is not on the loader path (e.g. it ships only inside a Python package such
# as PyTorch's nvidia-cublas wheel), this puts the directory of the first libcublas.so.13* found under
# /usr/local, /opt, /usr/lib, /usr/lib64 on LD_LIBRARY_PATH. Prints what it found.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  lk_cublas=$(find /usr/local /opt /usr/lib /usr/lib64 -name 'libcublas.so.13*' 2>/dev/null | head -n 1)
  [ -n "$lk_cublas" ] && export LD_LIBRARY_PATH="$(dirname "$lk_cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "cuBLAS: ${lk_cublas:-not found} (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})"
else
  echo "cuBLAS: on the loader path"
fi
