// Package opts parses swtpm-style sub-option strings such as
// "type=unixio,path=/run/x.sock,mode=0600,terminate".
//
// Tokens are name=value or a bare name (meaning name=true). A value that starts with '{' is a
// JSON map and may contain commas. Inside one string the first occurrence of a name wins, as
// in swtpm's option_get_*. Unknown names are refused. Booleans are true only for "true" or "1"
// (case-insensitive); anything else is false, as swtpm reads them.
package opts

import (
	"errors"
	"fmt"
	"os/user"
	"strconv"
	"strings"
)

// ErrUnknown is wrapped when a sub-option name is not allowed.
var ErrUnknown = errors.New("unknown option")

// Set is one parsed sub-option string.
type Set struct {
	Raw  string
	keys []string
	vals map[string]string
}

// Parse splits s into sub-options, refusing names not in allowed.
func Parse(s string, allowed ...string) (*Set, error) {
	set := &Set{Raw: s, vals: map[string]string{}}
	ok := make(map[string]bool, len(allowed))
	for _, a := range allowed {
		ok[a] = true
	}
	rest := s
	for rest != "" {
		var tok string
		name, after, hasEq := strings.Cut(rest, "=")
		if hasEq && !strings.Contains(name, ",") && strings.HasPrefix(after, "{") {
			end := jsonEnd(after)
			if end < 0 {
				return nil, fmt.Errorf("unterminated JSON value for '%s'", name)
			}
			tok = name + "=" + after[:end]
			rest = after[end:]
			if rest != "" {
				if rest[0] != ',' {
					return nil, fmt.Errorf("junk after JSON value for '%s'", name)
				}
				rest = rest[1:]
			}
		} else {
			tok, rest, _ = strings.Cut(rest, ",")
		}
		if tok == "" {
			continue
		}
		k, v, eq := strings.Cut(tok, "=")
		if !eq {
			v = "true"
		}
		if !ok[k] {
			return nil, fmt.Errorf("%w '%s'", ErrUnknown, k)
		}
		if _, dup := set.vals[k]; dup {
			continue // first occurrence wins
		}
		set.keys = append(set.keys, k)
		set.vals[k] = v
	}
	return set, nil
}

// jsonEnd returns the index just past the balanced {...} at the start of s, or -1.
func jsonEnd(s string) int {
	depth, inStr, esc := 0, false, false
	for i, c := range s {
		switch {
		case esc:
			esc = false
		case inStr && c == '\\':
			esc = true
		case c == '"':
			inStr = !inStr
		case inStr:
		case c == '{':
			depth++
		case c == '}':
			depth--
			if depth == 0 {
				return i + 1
			}
		}
	}
	return -1
}

// Has reports whether name was given.
func (s *Set) Has(name string) bool {
	if s == nil {
		return false
	}
	_, ok := s.vals[name]
	return ok
}

// Keys lists the names given, in order of first appearance.
func (s *Set) Keys() []string {
	if s == nil {
		return nil
	}
	return append([]string(nil), s.keys...)
}

// String returns the value of name, or def when absent.
func (s *Set) String(name, def string) string {
	if !s.Has(name) {
		return def
	}
	return s.vals[name]
}

// Bool returns true only for "true" or "1", def when absent.
func (s *Set) Bool(name string, def bool) bool {
	if !s.Has(name) {
		return def
	}
	v := strings.ToLower(s.vals[name])
	return v == "true" || v == "1"
}

// Int returns a signed decimal value.
func (s *Set) Int(name string, def int) (int, error) {
	if !s.Has(name) {
		return def, nil
	}
	n, err := strconv.Atoi(s.vals[name])
	if err != nil {
		return 0, fmt.Errorf("cannot parse '%s' value '%s' as a number", name, s.vals[name])
	}
	return n, nil
}

// Uint returns an unsigned decimal value.
func (s *Set) Uint(name string, def uint) (uint, error) {
	if !s.Has(name) {
		return def, nil
	}
	n, err := strconv.ParseUint(s.vals[name], 10, 32)
	if err != nil {
		return 0, fmt.Errorf("cannot parse '%s' value '%s' as an unsigned number", name, s.vals[name])
	}
	return uint(n), nil
}

// Mode returns an octal file mode, which must be <= 0777.
func (s *Set) Mode(name string, def uint32) (uint32, error) {
	if !s.Has(name) {
		return def, nil
	}
	n, err := strconv.ParseUint(s.vals[name], 8, 32)
	if err != nil || n > 0o777 {
		return 0, fmt.Errorf("invalid mode '%s' for '%s': must be an octal number <= 0777", s.vals[name], name)
	}
	return uint32(n), nil
}

// UID returns a user id given as a number or a user name; -1 when absent.
func (s *Set) UID(name string) (int, error) {
	if !s.Has(name) {
		return -1, nil
	}
	v := s.vals[name]
	if n, err := strconv.ParseUint(v, 10, 31); err == nil {
		return int(n), nil
	}
	u, err := user.Lookup(v)
	if err != nil {
		return 0, fmt.Errorf("unknown user '%s' for '%s'", v, name)
	}
	n, _ := strconv.Atoi(u.Uid)
	return n, nil
}

// GID returns a group id given as a number or a group name; -1 when absent.
func (s *Set) GID(name string) (int, error) {
	if !s.Has(name) {
		return -1, nil
	}
	v := s.vals[name]
	if n, err := strconv.ParseUint(v, 10, 31); err == nil {
		return int(n), nil
	}
	g, err := user.LookupGroup(v)
	if err != nil {
		return 0, fmt.Errorf("unknown group '%s' for '%s'", v, name)
	}
	n, _ := strconv.Atoi(g.Gid)
	return n, nil
}
