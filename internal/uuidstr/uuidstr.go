package uuidstr

// Len is the length of a UUID's canonical text form.
const Len = 36

// Valid reports whether s is a UUID in canonical form, in either case.
func Valid(s string) bool { return valid(s, true) }

// ValidLower reports whether s is a UUID in canonical form with lower-case digits only.
func ValidLower(s string) bool { return valid(s, false) }

// Suffix returns the UUID that ends s, in lower case, or "" when s does not end with one.
func Suffix(s string) string {
	if len(s) < Len || !Valid(s[len(s)-Len:]) {
		return ""
	}
	b := []byte(s[len(s)-Len:])
	for i, c := range b {
		if 'A' <= c && c <= 'F' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

func valid(s string, upper bool) bool {
	if len(s) != Len {
		return false
	}
	for i := 0; i < Len; i++ {
		c := s[i]
		switch {
		case i == 8 || i == 13 || i == 18 || i == 23:
			if c != '-' {
				return false
			}
		case '0' <= c && c <= '9', 'a' <= c && c <= 'f':
		case upper && 'A' <= c && c <= 'F':
		default:
			return false
		}
	}
	return true
}
