package uuidstr

import "testing"

func TestValid(t *testing.T) {
	tests := []struct {
		s            string
		valid, lower bool
	}{
		{"0f8fad5b-d9cb-469f-a165-70867728950e", true, true},
		{"0F8FAD5B-D9CB-469F-A165-70867728950E", true, false},
		{"0f8fad5b-d9cb-469f-a165-70867728950", false, false},
		{"0f8fad5b-d9cb-469f-a165-70867728950e0", false, false},
		{"0f8fad5bd-9cb-469f-a165-70867728950e", false, false},
		{"0f8fad5b-d9cb-469f-a165-70867728950g", false, false},
		{"0f8fad5b-d9cb-469f-a165_70867728950e", false, false},
		{"", false, false},
		{"../../../../../../../../etc/passwd00", false, false},
	}
	for _, tt := range tests {
		if got := Valid(tt.s); got != tt.valid {
			t.Errorf("Valid(%q) = %v", tt.s, got)
		}
		if got := ValidLower(tt.s); got != tt.lower {
			t.Errorf("ValidLower(%q) = %v", tt.s, got)
		}
	}
}

func TestSuffix(t *testing.T) {
	tests := map[string]string{
		"instance-0F8FAD5B-D9CB-469F-A165-70867728950E": "0f8fad5b-d9cb-469f-a165-70867728950e",
		"0f8fad5b-d9cb-469f-a165-70867728950e":          "0f8fad5b-d9cb-469f-a165-70867728950e",
		"vm-0f8fad5b-d9cb-469f-a165-70867728950e.json":  "",
		"short": "",
	}
	for in, want := range tests {
		if got := Suffix(in); got != want {
			t.Errorf("Suffix(%q) = %q, want %q", in, got, want)
		}
	}
}
