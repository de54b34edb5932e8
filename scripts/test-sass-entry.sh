#!/usr/bin/env bash
# Tests scripts/sass-entry.awk on a hand-written cuobjdump listing: a kernel that waits first passes; a
# branch, a memory access or a predicated wait before the wait, or no wait at all, fail; code for
# architectures below sm_90 is not checked, sm_90a and sm_100a are. Run by .ci/run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
listing='	code for sm_80
		Function : old_arch
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;
	code for sm_90
		Function : good
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   ACQBULK ;
        /*0020*/                   PREEXIT ;
        /*0030*/                   LDG.E R2, desc[UR4][R2.64] ;
		Function : branch_first
        /*0000*/                   ISETP.NE.AND P0, PT, R4, 0x1, PT ;
        /*0010*/              @!P0 BRA 0x30 ;
        /*0020*/                   ACQBULK ;
        /*0030*/                   LDG.E R2, desc[UR4][R2.64] ;
		Function : predicated_wait
        /*0000*/               @P0 ACQBULK ;
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
		Function : no_wait
        /*0000*/                   S2R R6, SR_TID.X ;
        /*0010*/                   EXIT ;
	code for sm_90a
		Function : hopper_tma_first
        /*0000*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0010*/                   ACQBULK ;
	code for sm_100a
		Function : good
        /*0000*/                   ACQBULK ;
		Function : blackwell_load
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0010*/                   ACQBULK ;'
want='blackwell_load (sm_100a): LDG before griddepcontrol.wait (ACQBULK)
branch_first (sm_90): @!P0 BRA before griddepcontrol.wait (ACQBULK)
hopper_tma_first (sm_90a): UTMALDG before griddepcontrol.wait (ACQBULK)
no_wait (sm_90): EXIT before griddepcontrol.wait (ACQBULK)
predicated_wait (sm_90): @P0 ACQBULK before griddepcontrol.wait (ACQBULK)
7 functions for sm_90 or newer, 5 without the wait first'
rc=0
got=$(awk -f "$here/sass-entry.awk" <<< "$listing" | LC_ALL=C sort) || rc=$?
want=$(LC_ALL=C sort <<< "$want")
[ "$rc" = 1 ] || { echo "sass-entry.awk exited $rc on a listing with bad kernels (expected 1)"; exit 1; }
[ "$got" = "$want" ] || { echo "sass-entry.awk printed:"; echo "$got"; echo "expected:"; echo "$want"; exit 1; }
ok=$(awk -f "$here/sass-entry.awk" <<< "$(sed -n '4,9p' <<< "$listing")") \
  || { echo "sass-entry.awk failed a kernel that waits first: $ok"; exit 1; }
echo "sass-entry.awk: the kernel that waits first passes; the 5 that do not are caught; sm_80 code is not checked"
