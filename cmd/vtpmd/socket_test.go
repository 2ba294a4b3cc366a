package main

import "testing"

func TestUsageMessage(t *testing.T) {
	o := newSocketOpts()
	err := o.tpmstate.Set("dir=/x,bogus=1")
	if err == nil || usageMessage(err) != "Unknown option 'bogus'" {
		t.Fatalf("usageMessage = %q", usageMessage(err))
	}
}
