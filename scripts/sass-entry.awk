# sass-entry.awk: reads `cuobjdump -sass` of a fatbin; for the sm_90 and sm_90a code (launched with
# programmatic dependent launch: src/device/cuda.rs), every function must execute griddepcontrol.wait
# (ACQBULK, from LK_KERNEL_ENTRY) before any global memory access, in the straight-line code the kernel
# starts with. Prints one line per function that does not, then a count; exits non-zero if any.
/code for sm_/ { arch = $NF }
/Function : / {
  fn = $NF; waited = 0
  if (arch ~ /^sm_90a?$/) { n++; checked[fn] = arch }
  next
}
arch ~ /^sm_90a?$/ && /^ +\/\*[0-9a-f]+\*\// {
  op = $2; if (op ~ /^@/) op = $3; sub(/\..*/, "", op); sub(/;$/, "", op)
  if (op == "ACQBULK") { if (!waited) has[fn] = 1; waited = 1; next }
  if (!waited && !(fn in early) && op ~ /^(LDG|STG|LDGSTS|LDGDEPBAR|UTMALDG|UTMASTG|UTMAPF|UBLKCP|UBLKRED|ATOMG|ATOM|RED|REDG|LD|ST|CCTL)$/)
    early[fn] = op
}
END {
  bad = 0
  for (f in checked) {
    if (f in early) { printf "%s (%s): %s before griddepcontrol.wait (ACQBULK)\n", f, checked[f], early[f]; bad++ }
    else if (!(f in has)) { printf "%s (%s): no griddepcontrol.wait (ACQBULK)\n", f, checked[f]; bad++ }
  }
  printf "%d sm_90 functions, %d without the wait first\n", n, bad
  exit bad > 0
}
