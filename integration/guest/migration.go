package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

// The migration tests' guest mode ("migloop" on the kernel command line): every half second it
// extends PCR16 (the "iter=N PCR16=..." rows the libvirt tests check as a hash chain), reads
// its NV counter back and compares it with the last value whose write the TPM acknowledged
// ("nvlost" when the TPM lost one), writes the next value, and reports the vTPM's migration
// index whenever its contents change.

const (
	migCounterIndex = 0x01500098 // the guest's own 8-byte counter (ordinary index, owner auth)
	migInfoIndex    = 0x01400020 // vtpmd's migration counter and current host identity
)

func migLoop(tp transport.TPM) {
	a := bytes.Repeat([]byte("A"), 32)
	cur, err := tpmclient.NVRead(tp, migCounterIndex, 8, 0)
	if err != nil {
		cur = make([]byte, 8)
		if err := tpmclient.NVDefine(tp, migCounterIndex, 8); err != nil {
			say("error", fmt.Sprintf("NV_DefineSpace: %v", err))
		} else if err := tpmclient.NVWrite(tp, migCounterIndex, cur, 0); err != nil {
			say("error", fmt.Sprintf("NV_Write: %v", err))
		}
	}
	acked := binary.BigEndian.Uint64(cur)
	say("nvcount_start", acked)
	lastInfo := "unread"
	for n := 1; ; n++ {
		ok := true
		if err := tpmclient.PCRExtend(tp, 16, a); err != nil {
			say("error", err)
			ok = false
		}
		v, err := tpmclient.PCRRead(tp, 16)
		if err != nil {
			ok = false
		}
		got, err := tpmclient.NVRead(tp, migCounterIndex, 8, 0)
		switch {
		case err != nil:
			say("nvread_error", err)
			ok = false
		case binary.BigEndian.Uint64(got) < acked:
			fmt.Printf("GUEST: nvlost acked=%d read=%d\n", acked, binary.BigEndian.Uint64(got))
		}
		next := make([]byte, 8)
		binary.BigEndian.PutUint64(next, acked+1)
		if err := tpmclient.NVWrite(tp, migCounterIndex, next, 0); err != nil {
			say("nvwrite_error", err)
			ok = false
		} else {
			acked++
		}
		// ok: every command of this iteration answered (the TPM is live)
		fmt.Printf("GUEST: iter=%d PCR16=%X nv=%d ok=%v\n", n, v, acked, ok)
		if info := migInfo(tp); info != lastInfo {
			say("migration_nv", info)
			say("migration_nv_tools", migInfoTools())
			lastInfo = info
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// migInfoTools reads the migration index as a relying party in the guest would, with stock
// tpm2-tools (owner auth): its contents in hex, or "error: ..." .
func migInfoTools() string {
	f, err := os.CreateTemp("", "mignv")
	if err != nil {
		return "error: " + err.Error()
	}
	f.Close()
	defer os.Remove(f.Name())
	cmd := exec.Command("/usr/bin/tpm2_nvread", "-C", "o", "-s", "136", "0x01400020", "-o", f.Name())
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=device:/dev/tpmrm0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "error:" + strings.Join(strings.Fields(err.Error()+": "+string(out)), "_")
	}
	b, err := os.ReadFile(f.Name())
	if err != nil {
		return "error: " + err.Error()
	}
	return fmt.Sprintf("%x", b)
}

// migInfo is the migration index's contents in hex, or "none" when it cannot be read (with
// the index's own empty auth, then with the owner's).
func migInfo(tp transport.TPM) string {
	b, err := readNV(tp, migInfoIndex)
	if err != nil {
		pub, perr := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(migInfoIndex)}.Execute(tp)
		if perr != nil {
			return "none"
		}
		p, perr := pub.NVPublic.Contents()
		if perr != nil {
			return "none"
		}
		if b, err = tpmclient.NVRead(tp, migInfoIndex, min(p.DataSize, 1024), 0); err != nil {
			return "none"
		}
	}
	return fmt.Sprintf("%x", b)
}
