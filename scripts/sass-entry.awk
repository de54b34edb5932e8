# sass-entry.awk: reads `cuobjdump -sass` of a fatbin. The code for sm_90 and newer may be launched with
# programmatic dependent launch (src/device/cuda.rs), so every function there must begin with
# griddepcontrol.wait (ACQBULK, from LK_KERNEL_ENTRY): before the first unpredicated ACQBULK only
# register arithmetic and loads of constants and special registers may come (the list below: anything
# else, a memory access, a branch that could skip the wait, a predicated wait, an opcode not listed, fails). Prints one line per function that breaks this, then a count; exits non-zero if any does.
BEGIN {
  split("LDC ULDC S2R S2UR CS2R R2UR MOV UMOV NOP IMAD IADD3 VIADD LOP3 SHF LEA PRMT SEL ISETP IMNMX " \
        "PLOP3 UIADD3 UIMAD ULOP3 USHF ULEA UPRMT USEL UISETP UPLOP3 FADD FMUL FFMA FSEL I2F F2I", a)
  for (i in a) allowed[a[i]] = 1
}
/code for sm_/ {
  arch = $NF; v = arch; sub(/^sm_/, "", v); sub(/[a-z]+$/, "", v)
  check = (v + 0 >= 90)
}
/Function : / {
  key = $NF " (" arch ")"
  if (check) { n++; checked[key] = 1 }
  next
}
check && /^ +\/\*[0-9a-f]+\*\// && !(key in done) {
  pred = ($2 ~ /^@/); op = pred ? $3 : $2; sub(/\..*/, "", op); sub(/;$/, "", op)
  if (op == "ACQBULK" && !pred) { done[key] = 1; next }
  if (!(op in allowed)) { early[key] = (pred ? $2 " " : "") op; done[key] = 1 }
}
END {
  bad = 0
  for (k in checked) {
    if (k in early) { printf "%s: %s before griddepcontrol.wait (ACQBULK)\n", k, early[k]; bad++ }
    else if (!(k in done)) { printf "%s: no griddepcontrol.wait (ACQBULK)\n", k; bad++ }
  }
  printf "%d functions for sm_90 or newer, %d without the wait first\n", n, bad
  exit bad > 0
}
